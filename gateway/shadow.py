"""Shadow traffic at the gateway: a candidate version gets a copy of live calls, and is compared.

A model's shadow (ModelService.SetShadow, kept in the model store) names a version and the share of
the default's calls that are copied to it, by a hash of the request id (salted: a canary's share and
a shadow's are independent). Calls that name a version, calls a canary sent to its candidate and
cache hits are not copied. The copy is sent after
the caller has its answer, from a bounded queue, by a few workers of the gateway's own: the caller
never waits for it and never sees it; a full queue drops the copy and counts it. The shadow's
answer is never returned and never cached; it is compared with the answer the caller got:

- outputs named "label": the share of rows on which the two versions agree;
- other float outputs: the mean absolute difference per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter, Histogram

from gateway.canary import share
from shared.errors import MaasError
from shared.tensors import to_numpy

log = logging.getLogger(__name__)

SHADOW_REQUESTS = Counter(
    "maas_gateway_shadow_requests_total",
    "Copies of live calls sent to a shadow version, by status ('dropped': the shadow queue was full)",
    ["model", "version", "code"],
)
SHADOW_ROWS = Counter(
    "maas_gateway_shadow_rows_total",
    "Rows of 'label' outputs the shadow version answered, by whether it agreed with the default's answer",
    ["model", "version", "outcome"],
)
SHADOW_ABS_DIFF = Histogram(
    "maas_gateway_shadow_abs_difference",
    "Mean absolute difference between the shadow's float outputs and the default's, per call",
    ["model", "version"],
    buckets=(1e-6, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0),
)


def shadow_share(request_id: str) -> int:
    """Where the request id falls for a shadow, 0 to 99; independent of its canary share."""
    return share(f"shadow/{request_id}")


@dataclass
class Copy:
    model: str
    version: int
    path: str
    backend: object  # gateway.backends.Backend
    request: bytes  # the caller's request, naming the shadow version
    answer: bytes  # the response the caller got, for the comparison
    response_type: type


class ShadowSender:
    """A bounded queue of copies and the workers that send them."""

    def __init__(self, queue_size: int, workers: int, timeout_s: float) -> None:
        self.queue: asyncio.Queue[Copy] = asyncio.Queue(maxsize=max(1, queue_size))
        self.workers = max(1, workers)
        self.timeout_s = timeout_s
        self._tasks: list[asyncio.Task] = []

    def offer(self, copy: Copy) -> None:
        """Queues `copy`, or drops it when the queue is full: the caller's call goes on either way."""
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._work()) for _ in range(self.workers)]
        try:
            self.queue.put_nowait(copy)
        except asyncio.QueueFull:
            SHADOW_REQUESTS.labels(copy.model, str(copy.version), "dropped").inc()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _work(self) -> None:
        while True:
            copy = await self.queue.get()
            try:
                await self._send(copy)
            except Exception:  # noqa: BLE001 - a shadow must never stop its worker
                log.exception("shadow call to %s v%d failed unexpectedly", copy.model, copy.version)
            finally:
                self.queue.task_done()

    async def _send(self, copy: Copy) -> None:
        version = str(copy.version)
        try:
            raw = await copy.backend.call(copy.path, copy.request, self.timeout_s)
        except MaasError as exc:
            SHADOW_REQUESTS.labels(copy.model, version, exc.code.name).inc()
            return
        SHADOW_REQUESTS.labels(copy.model, version, "OK").inc()
        compare(copy.model, version, copy.response_type.FromString(copy.answer), copy.response_type.FromString(raw))


def compare(model: str, version: str, answer, shadow) -> None:
    """Counts how far the shadow's outputs are from the answer the caller got."""
    outputs, theirs = getattr(answer, "outputs", None), getattr(shadow, "outputs", None)
    if outputs is None or theirs is None:
        return
    differences = []
    for name, tensor in outputs.items():
        if name not in theirs:
            continue
        try:
            mine, other = to_numpy(tensor, name), to_numpy(theirs[name], name)
        except MaasError:
            continue
        if mine.shape != other.shape:
            continue
        if name == "label":
            same = int(np.sum(mine == other))
            SHADOW_ROWS.labels(model, version, "agree").inc(same)
            SHADOW_ROWS.labels(model, version, "differ").inc(mine.size - same)
        elif mine.dtype.kind == "f" and mine.size:
            differences.append(float(np.mean(np.abs(mine.astype(np.float64) - other.astype(np.float64)))))
    if differences:
        SHADOW_ABS_DIFF.labels(model, version).observe(float(np.mean(differences)))
