"""Micro-batching on the gateway → dense service hop: concurrent Predicts travel as one call.

Dense Predicts for one model, version, output list and input signature (dtype and every
dimension but the first, per input) share a *lane*. A lane lets a few calls run at once:
`MAAS_GATEWAY_HOP_MAX_IN_FLIGHT` (1) per replica of the dense service, as the backend's target
lists them or DNS finds them. A request that finds a free slot and nobody waiting goes
out alone, as its caller's bytes, exactly as without batching: at low load nothing waits and
nothing is merged. Requests that find every slot busy queue; when a call returns, the queue
leaves as one Predict whose inputs are the queued inputs stacked on the batch axis (a byte
concatenation, no decoding of elements), and the response is cut back into one response per
caller. Under load a lane's backend calls carry many requests each, so the gateway pays one
client call, and the dense service one server call, for many callers.

What the unary hop guarantees still holds, because the merged call *is* a unary call on the
same channel:

- round robin over replicas and the channel's UNAVAILABLE retries (a replica that dies drops
  out, its calls go to another), and the dense service's SIGTERM drain;
- each caller keeps its own deadline: a merged call runs until the latest of its callers'
  deadlines, and a caller whose own deadline passes gets DEADLINE_EXCEEDED alone, the others
  still get their answers. A caller that goes away while queued is dropped before the call;
- a merged call that the service refuses as INVALID_ARGUMENT (one bad request among good
  ones) is retried request by request, so only the bad request's caller gets the error. A
  request the gateway cannot merge (a tensor whose bytes do not match its shape, a string
  tensor) always travels alone and gets the service's own answer;
- each caller's metrics, cache outcome and server span are its own; the backend call's client
  span covers the merged call.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field

import grpc
from prometheus_client import Counter, Histogram

from maas.dense.v1 import dense_pb2
from shared.errors import UpstreamError
from shared.tensors import NUMPY_DTYPES

HOP_BATCH_SIZE = Histogram(
    "maas_gateway_hop_batch_requests",
    "Requests per gateway → model service call (1: the request went alone)",
    ["family"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
HOP_SPLIT_RETRIES = Counter(
    "maas_gateway_hop_batch_retries_total",
    "Merged calls refused as a whole and retried request by request",
    ["family"],
)

ITEM_SIZES = {code: dtype.itemsize for code, dtype in NUMPY_DTYPES.items()}
# Refused as a whole, a merged call is sent again request by request: the reason may be one request's.
PER_REQUEST_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
                               grpc.StatusCode.FAILED_PRECONDITION})  # fmt: skip
# A lane whose merged call was refused while each of its requests alone was answered (a model with a
# fixed batch of one, outputs not stacked per row) sends its requests alone for this long, then tries again.
ALONE_FOR_S = 60.0
MAX_ALONE_LANES = 1024


@dataclass
class _Waiting:
    request: dense_pb2.PredictRequest
    raw: bytes
    rows: int
    deadline: float  # time.monotonic()
    future: asyncio.Future


@dataclass
class _Lane:
    in_flight: int = 0
    queue: deque[_Waiting] = field(default_factory=deque)


def lane_key(request: dense_pb2.PredictRequest) -> tuple | None:
    """What requests must share to travel as one; None for a request that must travel alone."""
    rows = None
    signature = []
    for name, tensor in request.inputs.items():
        size = ITEM_SIZES.get(tensor.dtype)
        if size is None or not tensor.shape or tensor.shape[0] <= 0:
            return None
        if rows is not None and tensor.shape[0] != rows:
            return None
        rows = tensor.shape[0]
        if len(tensor.data) != math.prod(tensor.shape) * size:
            return None
        signature.append((name, tensor.dtype, tuple(tensor.shape[1:])))
    if rows is None:
        return None
    return request.model_name, request.model_version, tuple(request.output_names), tuple(sorted(signature))


def merge(requests: list[dense_pb2.PredictRequest]) -> bytes:
    """One PredictRequest whose inputs are the requests' inputs, stacked in order on the batch axis."""
    first = requests[0]
    merged = dense_pb2.PredictRequest(model_name=first.model_name, model_version=first.model_version,
                                      output_names=first.output_names)  # fmt: skip
    rows = sum(r.inputs[next(iter(r.inputs))].shape[0] for r in requests)
    for name, tensor in first.inputs.items():
        target = merged.inputs[name]
        target.dtype = tensor.dtype
        target.shape.extend((rows, *tensor.shape[1:]))
        target.data = b"".join(r.inputs[name].data for r in requests)
    return merged.SerializeToString()


def split(response: bytes, rows: list[int]) -> list[bytes]:
    """The merged call's response cut into one serialized response per request, in order.

    ValueError if an output is not stacked on the batch axis (its first dimension is not the
    total of the rows)."""
    answer = dense_pb2.PredictResponse.FromString(response)
    total = sum(rows)
    cuts = []
    for name, tensor in answer.outputs.items():
        if not tensor.shape or tensor.shape[0] != total or len(tensor.data) % total:
            raise ValueError(f"output {name!r} of shape {list(tensor.shape)} is not batched over {total} rows")
        cuts.append((name, tensor, len(tensor.data) // total))
    parts, start = [], 0
    for count in rows:
        part = dense_pb2.PredictResponse(model_name=answer.model_name, model_version=answer.model_version)
        for name, tensor, row_bytes in cuts:
            target = part.outputs[name]
            target.dtype = tensor.dtype
            target.shape.extend((count, *tensor.shape[1:]))
            target.data = tensor.data[start * row_bytes : (start + count) * row_bytes]
        parts.append(part.SerializeToString())
        start += count
    return parts


class HopBatcher:
    """Dense Predicts to one backend, merged per lane while the lane's call slots are busy."""

    def __init__(self, backend, path: str, per_replica: int, max_rows: int, max_bytes: int) -> None:
        self.backend = backend
        self.path = path
        self.per_replica = max(1, per_replica)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._lanes: dict[tuple, _Lane] = {}
        self._alone_until: dict[tuple, float] = {}  # lanes not merged for now: time.monotonic() they may be again
        self._batch_size = HOP_BATCH_SIZE.labels(backend.family)
        self._retries = HOP_SPLIT_RETRIES.labels(backend.family)

    async def call(self, request: dense_pb2.PredictRequest, raw: bytes, timeout: float, alone: bool = False) -> bytes:
        """The response to `request` (serialized as `raw`); with `alone`, it is sent as it is, never merged."""
        key = None if alone else lane_key(request)
        if key is not None and key in self._alone_until:
            if self._alone_until[key] > time.monotonic():
                key = None
            else:
                del self._alone_until[key]
        if key is None:
            self._batch_size.observe(1)
            return await self.backend.call(self.path, raw, timeout)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        if lane.in_flight < self.max_in_flight() and not lane.queue:
            lane.in_flight += 1
            self._batch_size.observe(1)
            try:
                return await self.backend.call(self.path, raw, timeout)
            finally:
                self._slot_freed(key, lane)
        rows = request.inputs[next(iter(request.inputs))].shape[0]
        waiting = _Waiting(request, raw, rows, time.monotonic() + timeout, asyncio.get_running_loop().create_future())
        lane.queue.append(waiting)
        try:
            return await asyncio.wait_for(asyncio.shield(waiting.future), timeout)
        except TimeoutError:
            why = f"deadline exceeded waiting for the {self.backend.family} service"
            raise UpstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, why) from None
        finally:
            if not waiting.future.done():  # gone before its call: it never goes out
                waiting.future.cancel()

    def max_in_flight(self) -> int:
        """Calls a lane may have in flight: so many per replica, so that every replica has work while
        each call carries all that queued behind the last."""
        return self.per_replica * self.backend.replica_count()

    def _slot_freed(self, key: tuple, lane: _Lane) -> None:
        lane.in_flight -= 1
        slots = self.max_in_flight()
        while lane.in_flight < slots and lane.queue:
            batch = self._take(lane)
            if batch:
                lane.in_flight += 1
                asyncio.get_running_loop().create_task(self._send(key, lane, batch))
        if not lane.in_flight and not lane.queue and self._lanes.get(key) is lane:
            del self._lanes[key]

    def _take(self, lane: _Lane) -> list[_Waiting]:
        """The next merged call's requests, in arrival order; callers gone or out of time are left out."""
        batch: list[_Waiting] = []
        rows = size = 0
        now = time.monotonic()
        while lane.queue:
            waiting = lane.queue[0]
            if waiting.future.done() or waiting.deadline <= now:
                lane.queue.popleft()
                continue
            if batch and (rows + waiting.rows > self.max_rows or size + len(waiting.raw) > self.max_bytes):
                break
            batch.append(lane.queue.popleft())
            rows += waiting.rows
            size += len(waiting.raw)
        return batch

    async def _send(self, key: tuple, lane: _Lane, batch: list[_Waiting]) -> None:
        try:
            self._batch_size.observe(len(batch))
            if len(batch) == 1:
                await self._alone(batch[0])
                return
            timeout = max(w.deadline for w in batch) - time.monotonic()
            try:
                response = await self.backend.call(self.path, merge([w.request for w in batch]), timeout)
                parts = split(response, [w.rows for w in batch])
            except UpstreamError as exc:
                if exc.code not in PER_REQUEST_CODES:
                    for waiting in batch:
                        _settle(waiting, exc)
                    return
                await self._each_alone(key, batch)
                return
            except ValueError:  # outputs not stacked per row: each request alone
                await self._each_alone(key, batch)
                return
            except Exception as exc:  # no caller is left waiting on a call that failed unexpectedly
                for waiting in batch:
                    _settle(waiting, exc)
                raise
            for waiting, part in zip(batch, parts, strict=True):
                if not waiting.future.done():
                    waiting.future.set_result(part)
        finally:
            self._slot_freed(key, lane)

    async def _each_alone(self, key: tuple, batch: list[_Waiting]) -> None:
        """After a merged call was refused: every request sent again on its own."""
        self._retries.inc()
        answered = await asyncio.gather(*(self._alone(w) for w in batch))
        if all(answered):  # the merge was refused, not a request: the lane's requests go alone for a while
            if len(self._alone_until) >= MAX_ALONE_LANES:
                del self._alone_until[next(iter(self._alone_until))]
            self._alone_until[key] = time.monotonic() + ALONE_FOR_S

    async def _alone(self, waiting: _Waiting) -> bool:
        """Sends one queued request on its own; whether the service answered it."""
        if waiting.future.done():
            return False
        try:
            result = await self.backend.call(self.path, waiting.raw, waiting.deadline - time.monotonic())
        except UpstreamError as exc:
            _settle(waiting, exc)
            return False
        if not waiting.future.done():
            waiting.future.set_result(result)
        return True


def _settle(waiting: _Waiting, exc: BaseException) -> None:
    if not waiting.future.done():
        waiting.future.set_exception(exc)
