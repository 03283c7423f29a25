"""Dynamic batching: concurrent requests for one model version are run as one batch.

One `DynamicBatcher` per loaded model version. Callers `submit` an already validated item
and await their own result.

- **Fast path.** With no queue delay, a request that finds the queue empty and a batch slot
  free runs at once, exactly as with batching off: one executor call, no worker hop.
- **Batches** form only from requests that are already waiting (because every batch slot was
  busy) or that arrive within `max_queue_delay_us` of the oldest. A worker collects them until
  the batch is full or the delay has passed, drops items whose deadline has passed, and runs
  the rest as one call on the executor.
- **Slots.** Up to `max_concurrent_batches` batches run at once, so one batch does not
  serialise a version while cores are free. Each item's result depends only on the item
  (rows, graphs and texts are independent), so batch composition never changes an answer.
- A failing batch hands its error to every caller in it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from shared.errors import DeadlineExceededError, ResourceExhaustedError

Item = TypeVar("Item")
Result = TypeVar("Result")

BATCH_SIZE = Histogram(
    "maas_batch_size",
    "Rows (dense), nodes (gnn) or texts (nlp) per executed batch",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096),
)
# With several workers (multiprocess metrics), gauges add up over the live workers.
QUEUE_DEPTH = Gauge("maas_queue_depth", "Requests waiting to be batched", ["model"], multiprocess_mode="livesum")
FAST_PATH = Counter(
    "maas_batcher_fast_path_total",
    "Requests run at once, alone, because nothing was queued and a batch slot was free",
    ["model"],
)
SKIPPED = Counter(
    "maas_requests_skipped_total",
    "Requests dropped before compute: their deadline passed (expired) or their caller went away (cancelled)",
    ["model", "reason"],
)
REJECTED = Counter("maas_requests_rejected_total", "Requests refused because the queue was full", ["model"])


@dataclass(frozen=True)
class BatchPolicy:
    enabled: bool = True
    max_batch_size: int = 64
    max_queue_delay_us: int = 2000
    max_queue_size: int = 1024
    max_concurrent_batches: int = 1

    @classmethod
    def from_settings(cls, settings: Any, overrides: dict[str, Any] | None = None) -> BatchPolicy:
        """The service's settings, overridden by a model's own `batching` config."""
        values = {
            "enabled": settings.batching,
            "max_batch_size": settings.max_batch_size,
            "max_queue_delay_us": settings.max_queue_delay_us,
            "max_queue_size": settings.max_queue_size,
            "max_concurrent_batches": max(1, min(settings.max_concurrent_batches, settings.inference_threads)),
        }
        return cls(**{**values, **(overrides or {})})


@dataclass
class _Pending:
    item: Any
    size: int
    deadline: float | None
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher(Generic[Item, Result]):
    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[Item]], Sequence[Result]],
        size: Callable[[Item], int],
        policy: BatchPolicy,
        executor: Executor,
    ) -> None:
        self.name = name
        self.run_batch = run_batch
        self.size = size
        self.policy = policy
        self.executor = executor
        self._queue: deque[_Pending] = deque()
        self._queued_size = 0
        self._running = 0  # batches on the executor now, fast-path ones included
        # Created on first use, on the loop that serves requests.
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._closing = False
        self._batch_size = BATCH_SIZE.labels(name)
        self._fast_path = FAST_PATH.labels(name)
        self._queue_depth = QUEUE_DEPTH.labels(name)

    async def submit(self, item: Item, deadline: float | None = None) -> Result:
        """Runs `item` in a batch; `deadline` is a time.monotonic() value, or None for none."""
        loop = asyncio.get_running_loop()
        if not self.policy.enabled:
            _check_deadline(deadline, self.name)
            return (await loop.run_in_executor(self.executor, self.run_batch, [item]))[0]
        if (
            not self._queue
            and self._running < self.policy.max_concurrent_batches
            and self.policy.max_queue_delay_us <= 0
        ):
            return await self._run_alone(loop, item, deadline)
        if len(self._queue) >= self.policy.max_queue_size:
            REJECTED.labels(self.name).inc()
            raise ResourceExhaustedError(
                f"{self.name}: the queue is full ({len(self._queue)} requests waiting, "
                f"max_queue_size={self.policy.max_queue_size}); retry with back-off"
            )
        pending = _Pending(item, self.size(item), deadline, loop.create_future())
        self._queue.append(pending)
        self._queued_size += pending.size
        self._queue_depth.set(len(self._queue))
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._run(), name=f"batcher:{self.name}")
        self._wakeup.set()
        return await pending.future

    async def _run_alone(self, loop: asyncio.AbstractEventLoop, item: Item, deadline: float | None) -> Result:
        """The fast path: what batching off costs, while the slot it takes lets others batch behind it."""
        _check_deadline(deadline, self.name)
        self._fast_path.inc()
        self._batch_size.observe(self.size(item))
        running, result = self._submit(loop, [item])
        try:
            return (await result)[0]
        finally:
            if running.done():
                self._slot_freed()
            else:  # the caller went away while its item ran: the slot stays taken until the run ends
                running.add_done_callback(lambda _: loop.call_soon_threadsafe(self._slot_freed))

    def _submit(self, loop: asyncio.AbstractEventLoop, items: list[Item]) -> tuple[Future, asyncio.Future]:
        """Runs one batch on the executor in a batch slot; the caller frees the slot when it ends."""
        self._running += 1
        running = self.executor.submit(self.run_batch, items)
        return running, asyncio.wrap_future(running, loop=loop)

    def _slot_freed(self) -> None:
        self._running -= 1
        if self._wakeup is not None and (self._queue or self._closing):
            self._wakeup.set()

    @property
    def worker(self) -> asyncio.Task | None:
        return self._worker

    def close(self) -> None:
        """Stops the worker once the queue is empty: requests already queued still run."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue or self._running >= self.policy.max_concurrent_batches:
                if not self._queue and self._closing and self._running == 0:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_batch()
            batch = self._take_batch()
            live = self._drop_finished_and_expired(batch)
            if live:
                self._start(loop, live)

    def _start(self, loop: asyncio.AbstractEventLoop, live: list[_Pending]) -> None:
        self._batch_size.observe(sum(p.size for p in live))
        _, result = self._submit(loop, [p.item for p in live])
        result.add_done_callback(lambda done: self._finish(live, done))

    def _finish(self, live: list[_Pending], done: asyncio.Future) -> None:
        self._slot_freed()
        exc = done.exception()
        if exc is not None:  # every caller in the batch gets it
            for pending in live:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        for pending, result in zip(live, done.result(), strict=True):
            if not pending.future.done():
                pending.future.set_result(result)

    async def _wait_for_batch(self) -> None:
        """Waits until the queue holds a full batch or its oldest item has waited long enough."""
        flush_at = self._queue[0].enqueued + self.policy.max_queue_delay_us / 1e6
        while self._queued_size < self.policy.max_batch_size:
            remaining = flush_at - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Pending]:
        batch = [self._queue.popleft()]
        total = batch[0].size
        while self._queue and total + self._queue[0].size <= self.policy.max_batch_size:
            batch.append(self._queue.popleft())
            total += batch[-1].size
        self._queued_size -= total
        self._queue_depth.set(len(self._queue))
        return batch

    def _drop_finished_and_expired(self, batch: list[_Pending]) -> list[_Pending]:
        now = time.monotonic()
        live = []
        for pending in batch:
            expired = pending.deadline is not None and pending.deadline <= now
            if pending.future.done():  # the caller went away; gRPC cancels a call whose deadline passed
                SKIPPED.labels(self.name, "expired" if expired else "cancelled").inc()
                continue
            if expired:
                SKIPPED.labels(self.name, "expired").inc()
                pending.future.set_exception(_expired(self.name))
                continue
            live.append(pending)
        return live


def _expired(name: str) -> DeadlineExceededError:
    return DeadlineExceededError(f"{name}: the deadline passed while the request waited in the queue; it was not run")


def _check_deadline(deadline: float | None, name: str) -> None:
    if deadline is not None and deadline <= time.monotonic():
        SKIPPED.labels(name, "expired").inc()
        raise _expired(name)


def deadline_from(time_remaining: float | None) -> float | None:
    """A monotonic deadline from gRPC's context.time_remaining()."""
    return None if time_remaining is None else time.monotonic() + time_remaining


def concat_rows(items: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], list[int]]:
    """Concatenates each named input along the batch axis; returns the batch and each item's row count."""
    import numpy as np

    sizes = [len(next(iter(item.values()))) for item in items]
    if len(items) == 1:
        return items[0], sizes
    return {name: np.concatenate([item[name] for item in items]) for name in items[0]}, sizes


def split_rows(outputs: dict[str, Any], sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Splits batched outputs back into one dict per item, in order."""
    results, start = [], 0
    for size in sizes:
        results.append({name: value[start : start + size] for name, value in outputs.items()})
        start += size
    return results
