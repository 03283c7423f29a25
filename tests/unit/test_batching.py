"""The shared dynamic batcher, with a real executor and a recording batch function."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import REGISTRY

from shared.batching import BatchPolicy, DynamicBatcher, concat_rows, split_rows
from shared.errors import DeadlineExceededError, ResourceExhaustedError


class Recorder:
    """A batch function that doubles each item and remembers every batch it ran."""

    def __init__(self, fail_on=None, gate: threading.Event | None = None):
        self.batches: list[list[int]] = []
        self.fail_on = fail_on
        self.gate = gate

    def __call__(self, items):
        if self.gate is not None:
            self.gate.wait(10)
        self.batches.append(list(items))
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"cannot run {self.fail_on}")
        return [item * 2 for item in items]


def batcher(run, threads=1, name="test:1", **policy):
    return DynamicBatcher(name, run, lambda item: 1, BatchPolicy(**policy), ThreadPoolExecutor(threads))


def fast_path_count(name: str) -> float:
    return REGISTRY.get_sample_value("maas_batcher_fast_path_total", {"model": name}) or 0.0


async def test_concurrent_requests_run_as_one_batch_and_each_gets_its_own_result():
    run = Recorder()
    b = batcher(run, max_batch_size=8, max_queue_delay_us=50_000)
    results = await asyncio.gather(*(b.submit(i) for i in range(8)))
    assert results == [i * 2 for i in range(8)]
    assert run.batches == [list(range(8))]


async def test_a_batch_never_exceeds_max_batch_size():
    run = Recorder()
    b = batcher(run, max_batch_size=3, max_queue_delay_us=20_000)
    assert await asyncio.gather(*(b.submit(i) for i in range(7))) == [i * 2 for i in range(7)]
    assert all(len(batch) <= 3 for batch in run.batches)
    assert sorted(i for batch in run.batches for i in batch) == list(range(7))


async def test_a_lone_request_waits_at_most_the_queue_delay():
    run = Recorder()
    b = batcher(run, max_batch_size=64, max_queue_delay_us=1000)
    assert await asyncio.wait_for(b.submit(5), timeout=5) == 10


async def test_a_full_queue_answers_resource_exhausted_at_once():
    gate = threading.Event()
    run = Recorder(gate=gate)
    b = batcher(run, max_batch_size=1, max_queue_delay_us=0, max_queue_size=2)
    first = asyncio.ensure_future(b.submit(1))
    await asyncio.sleep(0.05)  # the worker now holds item 1 on the executor, blocked on the gate
    queued = [asyncio.ensure_future(b.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhaustedError, match="queue is full .*max_queue_size=2"):
        await b.submit(4)
    gate.set()
    assert await first == 2
    assert [await q for q in queued] == [4, 6]


async def test_expired_requests_are_dropped_before_compute():
    run = Recorder()
    b = batcher(run, max_batch_size=8, max_queue_delay_us=20_000)
    expired = b.submit(1, deadline=time.monotonic() - 0.001)
    alive = b.submit(2, deadline=time.monotonic() + 10)
    results = await asyncio.gather(expired, alive, return_exceptions=True)
    assert isinstance(results[0], DeadlineExceededError)
    assert results[1] == 4
    assert run.batches == [[2]]


async def test_a_deadline_that_passes_while_queued_is_skipped():
    run = Recorder()
    b = batcher(run, max_batch_size=8, max_queue_delay_us=200_000)
    with pytest.raises(DeadlineExceededError, match="not run"):
        await b.submit(1, deadline=time.monotonic() + 0.05)
    assert run.batches == []


async def test_a_failing_batch_hands_its_error_to_every_caller():
    run = Recorder(fail_on=3)
    b = batcher(run, max_batch_size=4, max_queue_delay_us=50_000)
    results = await asyncio.gather(*(b.submit(i) for i in range(4)), return_exceptions=True)
    assert all(isinstance(r, ValueError) and "cannot run 3" in str(r) for r in results)
    # The batcher keeps serving afterwards.
    assert await b.submit(7) == 14


async def test_batching_off_runs_each_request_alone():
    run = Recorder()
    b = batcher(run, enabled=False)
    assert await asyncio.gather(*(b.submit(i) for i in range(3))) == [0, 2, 4]
    assert sorted(run.batches) == [[0], [1], [2]]
    with pytest.raises(DeadlineExceededError):
        await b.submit(1, deadline=time.monotonic() - 1)


async def test_closing_lets_queued_requests_finish():
    run = Recorder()
    b = batcher(run, max_batch_size=8, max_queue_delay_us=50_000)
    pending = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
    await asyncio.sleep(0)
    b.close()
    assert [await p for p in pending] == [0, 2, 4]


async def test_a_lone_request_runs_at_once_on_the_fast_path():
    run = Recorder()
    b = batcher(run, name="lone:1", max_batch_size=64, max_queue_delay_us=0)
    before = fast_path_count("lone:1")
    assert await b.submit(5) == 10
    assert run.batches == [[5]]
    assert fast_path_count("lone:1") == before + 1
    assert b.worker is None  # no batcher task was involved


async def test_requests_that_arrive_while_the_slot_is_busy_form_one_batch():
    gate = threading.Event()
    run = Recorder(gate=gate)
    b = batcher(run, name="busy:1", max_batch_size=64, max_queue_delay_us=0)
    first = asyncio.ensure_future(b.submit(0))
    await asyncio.sleep(0.05)  # item 0 runs alone, holding the only slot
    waiting = [asyncio.ensure_future(b.submit(i)) for i in range(1, 6)]
    await asyncio.sleep(0.05)
    assert run.batches == []  # still blocked on the gate
    gate.set()
    assert await first == 0 and [await w for w in waiting] == [2, 4, 6, 8, 10]
    assert run.batches == [[0], [1, 2, 3, 4, 5]]


async def test_batches_run_side_by_side_up_to_max_concurrent_batches():
    together = threading.Barrier(2, timeout=5)  # passes only when two batches run at the same time

    def run(items):
        together.wait()
        return [item * 2 for item in items]

    b = batcher(run, threads=2, name="pair:1", max_batch_size=64, max_queue_delay_us=0, max_concurrent_batches=2)
    assert await asyncio.gather(b.submit(1), b.submit(2)) == [2, 4]


async def test_a_cancelled_caller_keeps_its_slot_until_its_batch_is_done():
    gate = threading.Event()
    run = Recorder(gate=gate)
    b = batcher(run, name="cancel:1", max_batch_size=64, max_queue_delay_us=0)
    first = asyncio.ensure_future(b.submit(1))
    await asyncio.sleep(0.05)
    first.cancel()
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(b.submit(2))
    await asyncio.sleep(0.05)
    assert not second.done()  # it queued behind the batch still on the executor, not beside it
    gate.set()
    assert await second == 4
    assert run.batches == [[1], [2]]


def test_concat_and_split_keep_each_items_rows():
    import numpy as np

    items = [{"x": np.full((n, 2), n)} for n in (1, 3, 2)]
    batch, sizes = concat_rows(items)
    assert batch["x"].shape == (6, 2) and sizes == [1, 3, 2]
    for item, back in zip(items, split_rows(batch, sizes), strict=True):
        np.testing.assert_array_equal(item["x"], back["x"])
