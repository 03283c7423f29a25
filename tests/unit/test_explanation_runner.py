"""ExplanationRunner: explanations answer within the caller's deadline, on threads of their own, and stop
there: past the deadline the work ends at its next checkpoint, freeing the thread for the next one."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from shared.errors import DeadlineExceededError
from shared.explanations import (
    Cancellation,
    ExplanationCancelled,
    ExplanationRunner,
    at_most_every,
    cancellable,
    checkpoint,
)


async def test_an_explanation_past_its_deadline_answers_deadline_exceeded_and_names_the_job_api():
    runner = ExplanationRunner(threads=1)
    release = threading.Event()
    with pytest.raises(DeadlineExceededError) as caught:
        # The work waits on an event the test sets only afterwards: the deadline, not speed, decides.
        await runner.run(release.wait, deadline=time.monotonic() + 0.05)
    assert "SubmitExplanation" in caught.value.message
    release.set()
    assert await runner.run(lambda: 42, deadline=time.monotonic() + 60) == 42


async def test_a_deadline_already_passed_fails_at_once():
    runner = ExplanationRunner(threads=1)
    with pytest.raises(DeadlineExceededError):
        await runner.run(lambda: 1, deadline=time.monotonic() - 1)


async def test_explanations_run_beside_the_event_loop():
    runner = ExplanationRunner(threads=1)
    release = threading.Event()
    pending = asyncio.ensure_future(runner.run(release.wait))
    await asyncio.sleep(0)  # the loop is free while the explanation waits
    assert not pending.done()
    release.set()
    assert await pending is True


def endless(steps: list[int]) -> None:
    """An explanation that never ends unless it is cancelled: it only stops at a checkpoint."""
    while True:
        checkpoint()
        steps.append(1)
        time.sleep(0.001)


async def test_an_explanation_past_its_deadline_stops_and_the_next_one_starts():
    runner = ExplanationRunner(threads=1)
    steps: list[int] = []
    cancellation = Cancellation()
    with pytest.raises(DeadlineExceededError):
        await runner.run(endless, steps, deadline=time.monotonic() + 0.05, cancellation=cancellation)
    assert cancellation.cancelled
    # One explanation thread: the next explanation runs only once the endless one has stopped.
    steps_when_next_ran = await runner.run(lambda: len(steps), deadline=time.monotonic() + 60)
    await asyncio.sleep(0.05)
    assert len(steps) == steps_when_next_ran  # the first one ran no step after it stopped
    assert cancellation.checks == steps_when_next_ran + 1  # its checks: the one at the start, then one per step


async def test_a_caller_that_goes_away_stops_its_explanation():
    runner = ExplanationRunner(threads=1)
    steps: list[int] = []
    cancellation = Cancellation()
    call = asyncio.ensure_future(runner.run(endless, steps, cancellation=cancellation))
    while not steps:
        await asyncio.sleep(0.01)
    call.cancel()  # as grpc.aio does when the client cancels or disconnects
    with pytest.raises(asyncio.CancelledError):
        await call
    assert cancellation.cancelled
    assert await runner.run(lambda: "next", deadline=time.monotonic() + 60) == "next"


async def test_an_explanation_queued_behind_one_past_its_deadline_never_starts():
    runner = ExplanationRunner(threads=1)
    started, release = threading.Event(), threading.Event()
    first = asyncio.ensure_future(runner.run(lambda: (started.set(), release.wait())))
    while not started.is_set():  # the only thread is busy
        await asyncio.sleep(0.01)
    ran: list[str] = []
    queued = Cancellation()
    with pytest.raises(DeadlineExceededError):
        await runner.run(ran.append, "queued", deadline=time.monotonic() + 0.05, cancellation=queued)
    release.set()
    await first
    await runner.run(lambda: None)  # after the queued one had its turn
    assert ran == [] and queued.checks == 0


def test_checkpoints_outside_a_runner_do_nothing_and_a_set_cancellation_raises():
    checkpoint()  # explanation code run directly (tests, jobs without a check) is never interrupted
    cancellation = Cancellation()
    cancellation.check()
    cancellation.cancel()
    with pytest.raises(ExplanationCancelled):
        cancellation.check()


def test_a_jobs_check_runs_at_most_once_per_interval():
    calls: list[int] = []
    with cancellable(at_most_every(3600, lambda: calls.append(1))):
        for _ in range(100):
            checkpoint()
    assert calls == []  # a job's check reads Redis: not once per forward pass
    with cancellable(at_most_every(0, lambda: calls.append(1))):
        for _ in range(3):
            checkpoint()
    assert calls == [1, 1, 1]
