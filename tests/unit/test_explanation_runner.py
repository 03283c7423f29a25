"""ExplanationRunner: explanations answer within the caller's deadline, on threads of their own."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from shared.errors import DeadlineExceededError
from shared.explanations import ExplanationRunner


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
