"""Dynamic batching: concurrent requests for one model version are run as one batch.

One `DynamicBatcher` per loaded model version. Callers `submit` an already validated item
and await their own result; a worker collects items until the batch is full or the oldest
has waited `max_queue_delay_us`, drops items whose deadline has passed, and runs the rest
as one call on the executor. A failing batch hands its error to every caller in it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
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
QUEUE_DEPTH = Gauge("maas_queue_depth", "Requests waiting to be batched", ["model"])
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

    @classmethod
    def from_settings(cls, settings: Any, overrides: dict[str, Any] | None = None) -> BatchPolicy:
        """The service's settings, overridden by a model's own `batching` config."""
        values = {
            "enabled": settings.batching,
            "max_batch_size": settings.max_batch_size,
            "max_queue_delay_us": settings.max_queue_delay_us,
            "max_queue_size": settings.max_queue_size,
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
        # Created on first use, on the loop that serves requests.
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._closing = False

    async def submit(self, item: Item, deadline: float | None = None) -> Result:
        """Runs `item` in a batch; `deadline` is a time.monotonic() value, or None for none."""
        loop = asyncio.get_running_loop()
        if not self.policy.enabled:
            _check_deadline(deadline, self.name)
            return (await loop.run_in_executor(self.executor, self.run_batch, [item]))[0]
        if len(self._queue) >= self.policy.max_queue_size:
            REJECTED.labels(self.name).inc()
            raise ResourceExhaustedError(
                f"{self.name}: the queue is full ({len(self._queue)} requests waiting, "
                f"max_queue_size={self.policy.max_queue_size}); retry with back-off"
            )
        pending = _Pending(item, self.size(item), deadline, loop.create_future())
        self._queue.append(pending)
        self._queued_size += pending.size
        QUEUE_DEPTH.labels(self.name).set(len(self._queue))
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._run(), name=f"batcher:{self.name}")
        self._wakeup.set()
        return await pending.future

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
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_batch()
            batch = self._take_batch()
            live = self._drop_finished_and_expired(batch)
            if not live:
                continue
            BATCH_SIZE.labels(self.name).observe(sum(p.size for p in live))
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, [p.item for p in live])
            except Exception as exc:  # noqa: BLE001 - every caller in the batch gets it
                for pending in live:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            for pending, result in zip(live, results, strict=True):
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
        QUEUE_DEPTH.labels(self.name).set(len(self._queue))
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
